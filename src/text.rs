//! Remote text made safe to show (DESIGN §7): titles, names and URIs come from peers, servers and
//! publishers, so control characters (which move a terminal's cursor or hide text) and Unicode
//! bidirectional controls (which reorder what a reader sees, e.g. an extension) are removed
//! before anything is displayed, kept or passed on.

/// Whether `c` must not reach a screen or a command line from remote text.
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200E}'
                | '\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2066}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `text` without control and bidi characters (unchanged, without copying, when it has none).
pub fn clean(text: String) -> String {
    if text.chars().any(is_unsafe) {
        text.chars().filter(|c| !is_unsafe(*c)).collect()
    } else {
        text
    }
}

/// `text` without control and bidi characters, but for line breaks and tabs: for messages of
/// several lines (an error quoting a config file) that may hold remote text.
pub fn clean_lines(text: String) -> String {
    let unsafe_here = |c: char| c != '\n' && c != '\t' && is_unsafe(c);
    if text.chars().any(unsafe_here) {
        text.chars().filter(|c| !unsafe_here(*c)).collect()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_lines_keeps_line_breaks_and_tabs() {
        assert_eq!(
            clean_lines("a\u{1b}]0;t\u{7}b\r\n\tc\u{202E}d".into()),
            "a]0;tb\n\tcd"
        );
    }

    #[test]
    fn control_and_bidi_characters_are_removed() {
        assert_eq!(clean("Big Buck Bunny".into()), "Big Buck Bunny");
        assert_eq!(clean("a\u{1b}[2Jb\r\nc\u{7f}".into()), "a[2Jbc");
        // "invoice\u{202E}fdp.exe" shows as "invoiceexe.pdf" in a bidi-aware terminal.
        assert_eq!(clean("invoice\u{202E}fdp.exe".into()), "invoicefdp.exe");
        assert_eq!(clean("x\u{2066}y\u{2069}\u{200F}z".into()), "xyz");
        assert_eq!(clean("日本語 émoji 🎬".into()), "日本語 émoji 🎬");
    }
}
