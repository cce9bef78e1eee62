//! How log lines look on stderr: plain lines, or — when stderr is the systemd journal — each line
//! with its sd-daemon priority prefix (`<3>` error, `<4>` warn, `<6>` info, `<7>` debug and
//! trace), so `journalctl -p warning` shows the warnings and errors and nothing else.
//!
//! systemd says that stderr is the journal by setting `JOURNAL_STREAM=DEV:INODE` to the device and
//! inode of the stream it connected; a child whose stderr was redirected elsewhere inherits the
//! variable but not the stream, so the two are compared (sd_journal_stream_fd(3), systemd.exec(5)).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The sd-daemon priority prefix (syslog levels) of a log level.
pub fn priority_prefix(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        Level::DEBUG | Level::TRACE => "<7>",
    }
}

/// Whether this process's stderr is the stream systemd connected to the journal.
pub fn stderr_is_journal() -> bool {
    let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(var) = var.to_str() else {
        return false;
    };
    match stderr_dev_ino() {
        Some((dev, ino)) => journal_stream_is(var, dev, ino),
        None => false,
    }
}

/// Whether a `JOURNAL_STREAM` value (`DEV:INODE`, decimal) names the file `dev`/`ino`.
pub fn journal_stream_is(var: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = var.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    // A duplicate of fd 2, so that the File dropped here closes only the duplicate.
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// What `main` prints for a fatal error: `error: MESSAGE` and a newline; when stderr is the
/// journal, every line of it with the error priority (a message may keep several lines, e.g.
/// TOML's pointer at a mistake).
pub fn fatal_error(message: &str, journal: bool) -> String {
    // It may quote remote text (a daemon's reply, a peer's words): no control characters.
    let text = crate::text::clean_lines(format!("error: {message}"));
    let prefix = if journal {
        priority_prefix(&Level::ERROR)
    } else {
        ""
    };
    let mut out = String::with_capacity(text.len() + 8);
    for line in text.lines() {
        out.push_str(prefix);
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Wraps an event format so that every line it writes starts with the event's priority prefix
/// (a message with a newline in it would otherwise continue at the journal's default priority).
#[derive(Debug, Clone)]
pub struct JournalFormat<F> {
    inner: F,
}

impl<F> JournalFormat<F> {
    pub fn new(inner: F) -> Self {
        Self { inner }
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalFormat<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut text = String::new();
        self.inner
            .format_event(ctx, Writer::new(&mut text), event)?;
        let prefix = priority_prefix(event.metadata().level());
        for (i, line) in text.lines().enumerate() {
            writer.write_str(prefix)?;
            // Without a timestamp the level is the first field, padded to its width.
            writer.write_str(if i == 0 { line.trim_start() } else { line })?;
            writer.write_char('\n')?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn log_every_level(journal: bool) -> String {
        let out = Captured::default();
        let format = tracing_subscriber::fmt::format()
            .without_time()
            .with_ansi(false);
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_writer(out.clone());
        let emit = || {
            tracing::error!("e1");
            tracing::warn!("w1");
            tracing::info!(peer = "abc", "i1");
            tracing::debug!("d1");
            tracing::trace!("t1");
            tracing::warn!("first\nsecond");
        };
        if journal {
            let subscriber = subscriber.event_format(JournalFormat::new(format)).finish();
            tracing::subscriber::with_default(subscriber, emit);
        } else {
            let subscriber = subscriber.event_format(format).finish();
            tracing::subscriber::with_default(subscriber, emit);
        }
        out.text()
    }

    #[test]
    fn journal_lines_carry_the_priority_of_their_level() {
        let text = log_every_level(true);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 7, "{text}");
        let expect = [
            ("<3>", "ERROR", "e1"),
            ("<4>", "WARN", "w1"),
            ("<6>", "INFO", "i1"),
            ("<7>", "DEBUG", "d1"),
            ("<7>", "TRACE", "t1"),
            ("<4>", "WARN", "first"),
        ];
        assert!(lines[2].starts_with("<6>INFO "), "{}", lines[2]);
        for (line, (prefix, level, message)) in lines.iter().zip(expect) {
            assert!(line.starts_with(prefix), "{line:?} should start {prefix}");
            assert!(line.contains(level) && line.contains(message), "{line:?}");
        }
        assert!(lines[2].contains("peer=\"abc\""), "{}", lines[2]);
        // The continuation line of a multi-line message keeps the warning priority.
        assert_eq!(lines[6], "<4>second");
    }

    #[test]
    fn plain_lines_have_no_prefix() {
        let text = log_every_level(false);
        assert_eq!(text.lines().count(), 7, "{text}");
        for line in text.lines() {
            assert!(!line.starts_with('<'), "{line:?}");
        }
        assert!(text.lines().next().unwrap().contains("ERROR"), "{text}");
    }

    #[test]
    fn journal_stream_names_one_file() {
        assert!(journal_stream_is("2049:131", 2049, 131));
        assert!(journal_stream_is("2049:131\n", 2049, 131));
        assert!(!journal_stream_is("2049:132", 2049, 131));
        assert!(!journal_stream_is("2048:131", 2049, 131));
        assert!(!journal_stream_is("", 2049, 131));
        assert!(!journal_stream_is("2049", 2049, 131));
        assert!(!journal_stream_is("x:131", 2049, 131));
        assert!(!journal_stream_is("2049:131:5", 2049, 131));
    }

    #[test]
    fn fatal_error_lines_all_carry_the_error_priority_in_the_journal() {
        assert_eq!(fatal_error("bad config", true), "<3>error: bad config\n");
        assert_eq!(
            fatal_error("line 2\n  | x = \n  |    ^", true),
            "<3>error: line 2\n<3>  | x = \n<3>  |    ^\n"
        );
        assert_eq!(fatal_error("bad\nconfig", false), "error: bad\nconfig\n");
    }
}
