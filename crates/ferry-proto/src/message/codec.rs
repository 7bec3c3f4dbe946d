//! The macro behind the table of messages in `mod.rs`: from one line per
//! message it makes the frame types (`kind`), the names, and the dispatch of
//! encoding and decoding, and checks the table when the crate compiles.

/// One line per message:
///
/// `tag presence Variant { fields } => family::{encode_fn, decode_fn};`
///
/// * `tag`: the frame type byte; `presence` is `optional` (a peer that does
///   not know it skips it: tags `0x80..`) or `required` (tags below `0x80`).
/// * `fields`: the variant's fields in order, bound by name; a tuple
///   variant's field by position and a name (`Failure { 0: failure }`); a
///   variant without fields has `{}`.
/// * `encode_fn(w, field, ...)` writes the body from references to the
///   fields; `decode_fn(reader)` reads a body back into the variant.
macro_rules! messages {
    (@bind $field:tt) => { $field };
    (@bind $field:tt : $bind:ident) => { $bind };
    (@optional optional) => { true };
    (@optional required) => { false };
    ($(
        $tag:literal $presence:ident $variant:ident { $($field:tt $(: $bind:ident)?),* }
            => $family:ident::{$encode:ident, $decode:ident};
    )*) => {
        /// The frame type of every message, named after its variant.
        #[allow(non_upper_case_globals)]
        pub(super) mod kind {
            $(pub const $variant: u8 = $tag;)*

            /// Every message: its frame type, its name, and whether it is optional.
            #[cfg(test)]
            pub const ALL: &[(u8, &str, bool)] = &[$((
                $tag,
                stringify!($variant),
                $crate::message::codec::messages!(@optional $presence),
            )),*];
        }

        const _: () = $crate::message::codec::check_table(&[$((
            $tag,
            $crate::message::codec::messages!(@optional $presence),
        )),*]);

        impl Message {
            /// A short name for logs.
            pub fn name(&self) -> &'static str {
                match self {
                    $(Message::$variant { .. } => stringify!($variant),)*
                }
            }

            /// Writes the body of this message; returns its frame type.
            fn encode_body(&self, w: &mut $crate::wire::FieldWriter) -> u8 {
                match self {
                    $(Message::$variant { $($field $(: $bind)?),* } => {
                        $family::$encode(w $(, $crate::message::codec::messages!(@bind $field $(: $bind)?))*);
                        kind::$variant
                    })*
                }
            }

            /// The decoder of the body of frame type `kind`, if it is known.
            fn body_decoder(
                kind: u8,
            ) -> Option<fn($crate::wire::FieldReader) -> Result<Message, $crate::wire::DecodeError>> {
                match kind {
                    $(kind::$variant => Some($family::$decode),)*
                    _ => None,
                }
            }
        }
    };
}

pub(super) use messages;

/// Refuses, when the crate compiles, a table where two messages share a frame
/// type or where `optional` disagrees with the type's high bit.
pub(super) const fn check_table(table: &[(u8, bool)]) {
    let mut i = 0;
    while i < table.len() {
        let (tag, optional) = table[i];
        assert!(
            (tag >= 0x80) == optional,
            "a message is optional exactly when its frame type is 0x80 or above"
        );
        let mut j = i + 1;
        while j < table.len() {
            assert!(tag != table[j].0, "two messages share a frame type");
            j += 1;
        }
        i += 1;
    }
}
