//! The `on_push` hook's command line (DESIGN §7: remote text is data, never code).
//!
//! A push's uri and title come from whoever set the session or published it — a peer, a
//! publisher, or any server a peer names — so they reach the hook's argv only as data:
//!
//! - substitution is one pass over each template argument: `{uri}`, `{title}` and `{from}` are
//!   replaced, and text that was inserted is never scanned again (a title holding `{uri}` stays
//!   literally that);
//! - an argument that would *start* with a value starting with `-` (a title `--log-file=…`
//!   would be an option to most programs) stops the hook for that push, unless the template puts
//!   a literal `--` argument before it, which ends a program's options;
//! - the uri must be absolute, with a scheme from `[hooks] schemes` (default `http`, `https`), so
//!   `file:`, `javascript:` and the like never reach a player or a browser;
//! - titles are passed without control and bidi characters (see [`crate::text`]).

use crate::control::PushRecord;

/// The schemes a uri may have by default.
pub const DEFAULT_SCHEMES: [&str; 2] = ["http", "https"];

/// Why the hook does not run for a push.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookRefusal {
    #[error("its uri scheme {0:?} is not in [hooks] schemes")]
    Scheme(String),
    #[error("its uri is not an absolute URI with a scheme")]
    NotAbsolute,
    #[error("{{{0}}} would start an argument with '-' (put \"--\" before it in on_push)")]
    LeadingDash(&'static str),
}

/// The argv for `record`, substituted from `template`, or why the hook must not run.
pub fn argv(
    template: &[String],
    record: &PushRecord,
    schemes: &[String],
) -> Result<Vec<String>, HookRefusal> {
    let from = record.from.as_deref().unwrap_or("");
    let title = crate::text::clean(record.title.clone());
    let uri = record.uri.as_str();
    let mut out = Vec::with_capacity(template.len());
    let mut options_ended = false;
    for arg in template {
        let mut built = String::with_capacity(arg.len());
        let mut rest = arg.as_str();
        let mut leading: Option<(&'static str, &str)> = None;
        while let Some(open) = rest.find('{') {
            built.push_str(&rest[..open]);
            let after = &rest[open..];
            let found = [("uri", uri), ("title", title.as_str()), ("from", from)]
                .into_iter()
                .find(|(name, _)| {
                    after
                        .strip_prefix('{')
                        .and_then(|a| a.strip_prefix(name))
                        .is_some_and(|a| a.starts_with('}'))
                });
            match found {
                Some((name, value)) => {
                    if name == "uri" {
                        check_scheme(uri, schemes)?;
                    }
                    // The first value that puts text at the argument's start (an empty one
                    // puts none, so the next value still starts the argument).
                    if built.is_empty() && leading.is_none() && !value.is_empty() {
                        leading = Some((name, value));
                    }
                    built.push_str(value);
                    rest = &after[name.len() + 2..];
                }
                None => {
                    built.push('{');
                    rest = &after[1..];
                }
            }
        }
        built.push_str(rest);
        if let Some((name, value)) = leading {
            if value.starts_with('-') && !options_ended {
                return Err(HookRefusal::LeadingDash(name));
            }
        }
        if arg == "--" {
            options_ended = true;
        }
        out.push(built);
    }
    Ok(out)
}

/// Whether `scheme` is a URI scheme (RFC 3986: ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )).
pub fn is_scheme(scheme: &str) -> bool {
    scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

/// Checks that `uri` is absolute, free of whitespace, control and bidi characters, and has a
/// scheme from `schemes` (lowercase), so it can be handed to another program as a URI (it
/// then cannot start with `-` either). Also used by [`crate::player`].
pub fn check_scheme(uri: &str, schemes: &[String]) -> Result<(), HookRefusal> {
    let Some((scheme, _)) = uri.split_once(':') else {
        return Err(HookRefusal::NotAbsolute);
    };
    let valid = is_scheme(scheme);
    if !valid
        || uri
            .chars()
            .any(|c| c.is_whitespace() || crate::text::is_unsafe(c))
    {
        return Err(HookRefusal::NotAbsolute);
    }
    if schemes.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
        Ok(())
    } else {
        Err(HookRefusal::Scheme(scheme.to_ascii_lowercase()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(uri: &str, title: &str) -> PushRecord {
        PushRecord {
            from: Some("abc".into()),
            uri: uri.into(),
            title: title.into(),
            body: None,
            position: None,
            meta: Default::default(),
            offset: 0,
        }
    }

    fn t(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    fn web() -> Vec<String> {
        DEFAULT_SCHEMES.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn substitution_is_one_pass() {
        let r = record("https://x/{title}", "{uri} and {from}");
        let argv = argv(
            &t(&["play", "{uri}", "--title={title}", "{from}"]),
            &r,
            &web(),
        )
        .unwrap();
        assert_eq!(
            argv,
            [
                "play",
                "https://x/{title}",
                "--title={uri} and {from}",
                "abc"
            ]
        );
    }

    #[test]
    fn a_value_starting_with_a_dash_never_starts_an_argument() {
        let r = record("https://x/", "--log-file=/var/lib/handoff/trust.json");
        assert_eq!(
            argv(&t(&["mpv", "{title}"]), &r, &web()),
            Err(HookRefusal::LeadingDash("title"))
        );
        // An empty value before it (a publisher's push has no `from`) does not hide it.
        let published = PushRecord {
            from: None,
            ..r.clone()
        };
        assert_eq!(
            argv(&t(&["notify", "{from}{title}"]), &published, &web()),
            Err(HookRefusal::LeadingDash("title"))
        );
        // Inside an option, or after "--", it is only data.
        assert!(argv(&t(&["mpv", "--title={title}", "{uri}"]), &r, &web()).is_ok());
        assert_eq!(
            argv(&t(&["notify", "--", "{title}"]), &r, &web()).unwrap()[2],
            "--log-file=/var/lib/handoff/trust.json"
        );
    }

    #[test]
    fn only_allowed_schemes_reach_the_hook() {
        let hook = t(&["xdg-open", "{uri}"]);
        for bad in [
            "file:///etc/passwd",
            "javascript:alert(1)",
            "JAVASCRIPT:alert(1)",
            "--help",
            "relative/path",
            "https://x/\u{202E}",
            "https://x/ a",
        ] {
            assert!(argv(&hook, &record(bad, "t"), &web()).is_err(), "{bad}");
        }
        assert!(argv(&hook, &record("HTTPS://media.example/a", "t"), &web()).is_ok());
        let files = t(&["file"]);
        assert!(argv(&hook, &record("file:///srv/a.mp4", "t"), &files).is_ok());
        // A hook that does not use the uri does not care about it.
        assert!(argv(&t(&["beep"]), &record("file:///x", "t"), &web()).is_ok());
    }

    #[test]
    fn titles_lose_control_and_bidi_characters() {
        let r = record("https://x/", "a\u{1b}[31mb\u{202E}c");
        assert_eq!(argv(&t(&["{title}"]), &r, &web()).unwrap(), ["a[31mbc"]);
    }
}
