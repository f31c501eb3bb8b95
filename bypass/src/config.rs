//! The `--config` file: TOML with one `[[rule]]` table per redirect.
//!
//! ```toml
//! [[rule]]
//! from = "10.0.0.22:80"
//! to = ":3000"          # no IP: keep the address of `from`
//! protocol = "tcp"      # optional, tcp or udp; tcp when left out
//! ```

use std::{fs, io::Read, path::Path};

use serde::Deserialize;
use toml::Spanned;

use crate::rule::{DuplicateRule, Origin, Protocol, Rule, RuleError, RuleSet};

/// Largest config file accepted. Real rule files are a few kilobytes; the cap keeps a wrong
/// path (a log file, a device) from being read into memory.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Reason a config file was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")]
    TooLarge { path: String },
    #[error("config file {path} is not UTF-8 text")]
    NotUtf8 { path: String },
    #[error("invalid config file {path}, line {line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
    #[error("invalid rule in {path}, line {line}")]
    Rule {
        path: String,
        line: usize,
        source: RuleError,
    },
    #[error(transparent)]
    Duplicate(#[from] DuplicateRule),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default)]
    rule: Vec<Spanned<RuleTable>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleTable {
    from: String,
    to: String,
    protocol: Option<Spanned<String>>,
}

/// Reads the config file at `path` and adds its rules to `rules`.
pub fn load(path: &Path, rules: &mut RuleSet) -> Result<(), ConfigError> {
    let shown = path.display().to_string();
    let read_error = |source| ConfigError::Read {
        path: shown.clone(),
        source,
    };

    let file = fs::File::open(path).map_err(read_error)?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge { path: shown });
    }
    let text = String::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 {
        path: shown.clone(),
    })?;
    parse(&text, &shown, rules)
}

/// Parses config text; `path` is used in messages and rule origins only.
pub fn parse(text: &str, path: &str, rules: &mut RuleSet) -> Result<(), ConfigError> {
    let file: ConfigFile = toml::from_str(text).map_err(|err| ConfigError::Syntax {
        path: path.to_owned(),
        line: err.span().map_or(1, |span| line_of(text, span.start)),
        message: one_line(err.message()),
    })?;

    // Offsets of the line ends, so that finding each table's line costs a binary search, not
    // a scan from the start (quadratic in a file of many rules).
    let newlines: Vec<usize> = text.match_indices('\n').map(|(at, _)| at).collect();
    for table in file.rule {
        let line = newlines.partition_point(|&at| at < table.span().start) + 1;
        let table = table.into_inner();
        let rule_error = |source| ConfigError::Rule {
            path: path.to_owned(),
            line,
            source,
        };

        let protocol = match &table.protocol {
            Some(protocol) => protocol.get_ref().parse().map_err(rule_error)?,
            None => Protocol::Tcp,
        };
        let rule = Rule::new(protocol, table.from.trim(), table.to.trim()).map_err(rule_error)?;
        rules.push(
            rule,
            Origin::Config {
                path: path.to_owned(),
                line,
            },
        )?;
    }
    Ok(())
}

/// Joins the lines of a parser message (toml puts "expected ..." on a line of its own), so
/// that every error stays one line.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    lines.join("; ")
}

/// Returns the 1-based line number of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> RuleSet {
        let mut rules = RuleSet::default();
        parse(text, "bypass.toml", &mut rules).unwrap_or_else(|err| panic!("{err}"));
        rules
    }

    fn parse_err(text: &str) -> String {
        let mut rules = RuleSet::default();
        let err = parse(text, "bypass.toml", &mut rules).expect_err(text);
        format!("{:#}", anyhow::Error::from(err))
    }

    #[test]
    fn reads_rule_tables() {
        let rules = parse_ok(
            "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n\n\
             [[rule]]\nprotocol = \"udp\"\nfrom = \"10.0.0.53:53\"\nto = \"127.0.0.1:5353\"\n",
        );
        let texts: Vec<String> = rules.iter().map(|(rule, _)| rule.to_string()).collect();
        assert_eq!(
            texts,
            [
                "tcp/10.0.0.22:80=10.0.0.22:3000",
                "udp/10.0.0.53:53=127.0.0.1:5353"
            ]
        );
        let origins: Vec<String> = rules.iter().map(|(_, origin)| origin.to_string()).collect();
        assert_eq!(origins, ["bypass.toml:1", "bypass.toml:5"]);
    }

    #[test]
    fn empty_file_has_no_rules() {
        assert!(parse_ok("").is_empty());
    }

    #[test]
    fn syntax_error_names_line() {
        let message = parse_err("[[rule]]\nfrom = \"10.0.0.22:80\"\nto = :3000\n");
        assert!(
            message.starts_with("invalid config file bypass.toml, line 3: "),
            "{message}"
        );
        assert!(!message.contains('\n'), "not one line: {message}");
    }

    #[test]
    fn syntax_error_is_one_line() {
        let message = parse_err("A=:");
        assert!(!message.contains('\n'), "{message}");
        assert!(
            message.starts_with("invalid config file bypass.toml, line 1: "),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_is_rejected() {
        let message = parse_err("[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":1\"\nport = 3\n");
        assert!(message.contains("unknown field `port`"), "{message}");
        assert!(message.contains("line 4"), "{message}");
    }

    #[test]
    fn missing_key_is_rejected() {
        let message = parse_err("[[rule]]\nfrom = \"10.0.0.22:80\"\n");
        assert!(message.contains("missing field `to`"), "{message}");
    }

    #[test]
    fn bad_rule_names_line_and_reason() {
        let message = parse_err("\n[[rule]]\nfrom = \"10.0.0.22:99999\"\nto = \":1\"\n");
        assert_eq!(
            message,
            "invalid rule in bypass.toml, line 2: port 99999 is out of range (1-65535)"
        );
        let message =
            parse_err("[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":1\"\nprotocol = \"icmp\"");
        assert!(
            message.ends_with("unknown protocol `icmp` (expected tcp or udp)"),
            "{message}"
        );
    }

    #[test]
    fn duplicate_in_file_is_rejected() {
        let table = "[[rule]]\nfrom = \"10.0.0.22:80\"\nto = \":3000\"\n";
        let message = parse_err(&format!("{table}{table}"));
        assert!(message.contains("has the same source as"), "{message}");
    }

    #[test]
    fn missing_file_names_path() {
        let mut rules = RuleSet::default();
        let err = load(Path::new("/nonexistent/bypass.toml"), &mut rules).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read config file /nonexistent/bypass.toml")
        );
    }
}
