//! Asking for an encrypted SSH key's passphrase on the terminal, without echo.
//!
//! Only when standard input is a terminal: the prompt is written to and the
//! answer read from `/dev/tty`, with `ECHO` turned off (and `ECHONL` on, so
//! the Enter still shows) and the terminal's settings restored afterwards,
//! also on an error. Without a terminal there is no prompt, and the
//! library's error says to set `FERRY_SSH_PASSPHRASE`.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry::sftp::PassphrasePrompt;
use rustix::termios::{self, LocalModes, OptionalActions, Termios};

/// Answers given so far, per key file: kept for the rest of the process, so
/// a reconnect, or the next queued copy `ferry agent` runs, does not ask again.
static KNOWN: Mutex<Option<HashMap<PathBuf, String>>> = Mutex::new(None);

/// A prompt for [`ferry::sftp::SshConfig::passphrase_prompt`] when standard
/// input is a terminal, else `None`. `multi` is the progress display, hidden
/// while asking.
pub fn terminal_prompt(multi: Option<indicatif::MultiProgress>) -> Option<PassphrasePrompt> {
    if !termios::isatty(std::io::stdin()) {
        return None;
    }
    Some(PassphrasePrompt(Arc::new(move |key: &Path| {
        let cached = KNOWN
            .lock()
            .ok()
            .and_then(|k| k.as_ref().and_then(|k| k.get(key).cloned()));
        if let Some(p) = cached {
            return Ok(Some(p));
        }
        // Up to three tries, as ssh gives; only an answer that opens the key is kept.
        // The answer, and whether it opens the key.
        let ask = || -> std::io::Result<Option<(String, bool)>> {
            let prompt = format!("Enter passphrase for key {}: ", key.display());
            let mut last = None;
            for attempt in 1..=3 {
                let Some(a) = ask_on_tty(&prompt)? else {
                    return Ok(None);
                };
                if ferry::sftp::auth::passphrase_opens(key, &a) {
                    return Ok(Some((a, true)));
                }
                if attempt < 3 {
                    say_on_tty("Bad passphrase, try again.\n");
                }
                last = Some((a, false));
            }
            Ok(last)
        };
        let answer = match &multi {
            Some(m) => m.suspend(ask)?,
            None => ask()?,
        };
        if let (Some((a, true)), Ok(mut k)) = (&answer, KNOWN.lock()) {
            k.get_or_insert_with(HashMap::new)
                .insert(key.to_path_buf(), a.clone());
        }
        // A wrong one goes on too: the library's error then says so.
        Ok(answer.map(|(a, _)| a))
    })))
}

/// Puts the terminal's settings back when dropped.
struct EchoOff<'a> {
    tty: &'a std::fs::File,
    saved: Termios,
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(self.tty, OptionalActions::Now, &self.saved);
    }
}

/// Best effort: a line on the terminal.
fn say_on_tty(msg: &str) {
    if let Ok(mut tty) = std::fs::OpenOptions::new().write(true).open("/dev/tty") {
        let _ = tty.write_all(msg.as_bytes());
    }
}

/// Writes `prompt` to `/dev/tty` and reads one line there without echo.
/// `Ok(None)` at end of input (Ctrl-D) or for an empty line.
fn ask_on_tty(prompt: &str) -> std::io::Result<Option<String>> {
    let tty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/tty")?;
    let saved = termios::tcgetattr(&tty)?;
    let mut quiet = saved.clone();
    quiet.local_modes -= LocalModes::ECHO;
    quiet.local_modes |= LocalModes::ECHONL;
    // `Now`, not `Flush`: a passphrase typed ahead is kept.
    termios::tcsetattr(&tty, OptionalActions::Now, &quiet)?;
    let _restore = EchoOff { tty: &tty, saved };
    (&tty).write_all(prompt.as_bytes())?;
    (&tty).flush()?;
    let mut line = String::new();
    let n = std::io::BufReader::new(&tty).read_line(&mut line)?;
    let answer = line.trim_end_matches(['\n', '\r']);
    Ok((n > 0 && !answer.is_empty()).then(|| answer.to_string()))
}
