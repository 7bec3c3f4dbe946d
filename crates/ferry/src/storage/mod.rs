//! Where received files are kept and sent files are read from.
//!
//! * [`source`]: local files being sent.

pub mod source;
