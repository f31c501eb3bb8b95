//! Redirect rules: `[tcp/|udp/]FROM=TO`, their parsing, and the rule set given to the loader.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use bypass_common::{PROTO_TCP, PROTO_UDP};

/// The rule used when neither `--rule` nor `--config` gives one.
pub const DEFAULT_RULE: &str = "tcp/10.0.0.22:80=10.0.0.22:3000";

/// Transport protocol a rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// Returns the `IPPROTO_*` number the kernel reports in `bpf_sock_addr.protocol`.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => PROTO_TCP,
            Self::Udp => PROTO_UDP,
        }
    }
}

impl FromStr for Protocol {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        match text.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            _ => Err(RuleError::UnknownProtocol(text.to_owned())),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One redirect: connections of `protocol` to `from` go to `to` instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    pub protocol: Protocol,
    pub from: SocketAddr,
    pub to: SocketAddr,
}

/// Reason a rule was rejected. The caller adds which rule and where it came from.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("expected FROM=TO, e.g. 10.0.0.22:80=:3000 or udp/10.0.0.53:53=127.0.0.1:5353")]
    MissingEquals,
    #[error("unknown protocol `{}` (expected tcp or udp)", printable(.0))]
    UnknownProtocol(String),
    #[error("`{}` has no port; write IP:PORT, e.g. 10.0.0.22:80 or [fd00::22]:80", printable(.0))]
    MissingPort(String),
    #[error("`{}` is not an IP address", printable(.0))]
    InvalidAddress(String),
    #[error("port `{}` is not a number", printable(.0))]
    InvalidPort(String),
    #[error("port {0} is out of range (1-65535)")]
    PortOutOfRange(u64),
    #[error("FROM is {from} but TO is {to}; a rule cannot change the address family")]
    FamilyMismatch {
        from: &'static str,
        to: &'static str,
    },
    #[error("the target is the same as the source, so the rule would change nothing")]
    SameTarget,
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(text: &str) -> Result<Self, RuleError> {
        let text = text.trim();
        let (protocol, body) = match text.split_once('/') {
            Some((protocol, body)) => (protocol.parse()?, body),
            None => (Protocol::Tcp, text),
        };
        let (from, to) = body.split_once('=').ok_or(RuleError::MissingEquals)?;
        Rule::new(protocol, from.trim(), to.trim())
    }
}

impl Rule {
    /// Builds a rule from its parts: `from` is `IP:PORT`, `to` is `[IP]:PORT`, where a
    /// missing IP keeps the address of `from`.
    pub fn new(protocol: Protocol, from: &str, to: &str) -> Result<Self, RuleError> {
        let from = parse_endpoint(from)?;
        let (to_ip, to_port) = match to.strip_prefix(':') {
            Some(port) => (from.ip(), parse_port(port)?),
            None => {
                let to = parse_endpoint(to)?;
                (to.ip(), to.port())
            }
        };
        if from.is_ipv4() != to_ip.is_ipv4() {
            return Err(RuleError::FamilyMismatch {
                from: family_name(from.ip()),
                to: family_name(to_ip),
            });
        }
        let to = SocketAddr::new(to_ip, to_port);
        if from == to {
            return Err(RuleError::SameTarget);
        }
        Ok(Self { protocol, from, to })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}={}", self.protocol, self.from, self.to)
    }
}

/// Escapes control characters (`\n`, `\u{1b}`) in a value quoted back in a message, so that
/// a config file cannot break an error into several lines or send terminal escapes.
pub(crate) fn printable(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn family_name(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Parses `IP:PORT` or `[IPv6]:PORT`.
fn parse_endpoint(text: &str) -> Result<SocketAddr, RuleError> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| RuleError::InvalidAddress(text.to_owned()))?;
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| RuleError::MissingPort(text.to_owned()))?;
        (host, port)
    } else {
        match text.rsplit_once(':') {
            // More than one colon without brackets is an IPv6 address with no port.
            Some((host, _)) if host.contains(':') => {
                return Err(RuleError::MissingPort(text.to_owned()));
            }
            Some((host, port)) => (host, port),
            None if text.parse::<IpAddr>().is_ok() => {
                return Err(RuleError::MissingPort(text.to_owned()));
            }
            None => return Err(RuleError::InvalidAddress(text.to_owned())),
        }
    };
    let ip = host
        .parse::<IpAddr>()
        .map_err(|_| RuleError::InvalidAddress(host.to_owned()))?;
    Ok(SocketAddr::new(ip, parse_port(port)?))
}

fn parse_port(text: &str) -> Result<u16, RuleError> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(RuleError::InvalidPort(text.to_owned()));
    }
    // Digits only, so the only possible failure is overflow; saturate to report the range.
    let port = text.parse::<u64>().unwrap_or(u64::MAX);
    match u16::try_from(port) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(RuleError::PortOutOfRange(port)),
    }
}

/// Source of a rule, for error messages and the start-up log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    CommandLine,
    Config { path: String, line: usize },
    Default,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CommandLine => f.write_str("--rule"),
            Self::Config { path, line } => write!(f, "{path}:{line}"),
            Self::Default => f.write_str("default"),
        }
    }
}

/// The rules of one attachment, in order; a rule's index is its rule id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSet {
    entries: Vec<(Rule, Origin)>,
    /// Index into `entries` by protocol and source, so that adding n rules costs O(n), not
    /// O(n²): a config file may hold tens of thousands.
    by_source: HashMap<(Protocol, SocketAddr), usize>,
}

/// A second rule for a source that already has one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "rule `{rule}` ({origin}) has the same source as `{earlier}` ({earlier_origin}); \
     remove one of them"
)]
pub struct DuplicateRule {
    pub rule: Rule,
    pub origin: Origin,
    pub earlier: Rule,
    pub earlier_origin: Origin,
}

impl RuleSet {
    /// Adds a rule, rejecting a second rule for the same protocol and source.
    pub fn push(&mut self, rule: Rule, origin: Origin) -> Result<(), DuplicateRule> {
        let source = (rule.protocol, rule.from);
        if let Some(&index) = self.by_source.get(&source) {
            let (earlier, earlier_origin) = &self.entries[index];
            return Err(DuplicateRule {
                rule,
                origin,
                earlier: *earlier,
                earlier_origin: earlier_origin.clone(),
            });
        }
        self.by_source.insert(source, self.entries.len());
        self.entries.push((rule, origin));
        Ok(())
    }

    /// Returns the built-in default set, [`DEFAULT_RULE`].
    pub fn default_rules() -> Self {
        let rule = DEFAULT_RULE.parse().expect("the default rule is valid");
        let mut rules = Self::default();
        rules
            .push(rule, Origin::Default)
            .expect("one rule has no duplicate");
        rules
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Iterates over the rules with their origins, in rule id order.
    pub fn iter(&self) -> impl Iterator<Item = &(Rule, Origin)> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        text.parse()
            .unwrap_or_else(|err| panic!("`{text}` should parse: {err}"))
    }

    fn error(text: &str) -> RuleError {
        text.parse::<Rule>().expect_err(text)
    }

    #[test]
    fn target_without_ip_keeps_source_ip() {
        let parsed = rule("10.0.0.22:80=:3000");
        assert_eq!(parsed.protocol, Protocol::Tcp);
        assert_eq!(parsed.from, "10.0.0.22:80".parse().unwrap());
        assert_eq!(parsed.to, "10.0.0.22:3000".parse().unwrap());
    }

    #[test]
    fn protocol_prefix_selects_udp() {
        let parsed = rule("udp/10.0.0.53:53=127.0.0.1:5353");
        assert_eq!(parsed.protocol, Protocol::Udp);
        assert_eq!(parsed.to, "127.0.0.1:5353".parse().unwrap());
        assert_eq!(rule("TCP/10.0.0.1:1=:2").protocol, Protocol::Tcp);
    }

    #[test]
    fn ipv6_rules_use_brackets() {
        let parsed = rule("[fd00::22]:80=[fd00::22]:3000");
        assert_eq!(parsed.from, "[fd00::22]:80".parse().unwrap());
        assert_eq!(
            rule("[fd00::22]:80=:3000").to,
            "[fd00::22]:3000".parse().unwrap()
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "tcp/10.0.0.22:80=10.0.0.22:3000",
            "udp/[fd00::22]:53=[::1]:5353",
        ] {
            assert_eq!(rule(text).to_string(), text);
        }
    }

    #[test]
    fn bad_rules_name_the_problem() {
        assert_eq!(error("10.0.0.22:80"), RuleError::MissingEquals);
        assert_eq!(
            error("sctp/10.0.0.22:80=:81"),
            RuleError::UnknownProtocol("sctp".into())
        );
        assert_eq!(
            error("10.0.0.300:80=:81"),
            RuleError::InvalidAddress("10.0.0.300".into())
        );
        assert_eq!(
            error("example:80=:81"),
            RuleError::InvalidAddress("example".into())
        );
        assert_eq!(
            error("10.0.0.22=:81"),
            RuleError::MissingPort("10.0.0.22".into())
        );
        assert_eq!(
            error("fd00::22=:81"),
            RuleError::MissingPort("fd00::22".into())
        );
        assert_eq!(
            error("[fd00::22]=:81"),
            RuleError::MissingPort("[fd00::22]".into())
        );
        assert_eq!(
            error("10.0.0.22:99999=:80"),
            RuleError::PortOutOfRange(99999)
        );
        assert_eq!(error("10.0.0.22:0=:80"), RuleError::PortOutOfRange(0));
        assert_eq!(error("10.0.0.22:80=:0"), RuleError::PortOutOfRange(0));
        assert_eq!(
            error("10.0.0.22:http=:80"),
            RuleError::InvalidPort("http".into())
        );
        assert_eq!(
            error("10.0.0.22:80=:"),
            RuleError::InvalidPort(String::new())
        );
        assert_eq!(error("10.0.0.22:80=:80"), RuleError::SameTarget);
        assert!(matches!(
            error("10.0.0.22:80=[::1]:80"),
            RuleError::FamilyMismatch { .. }
        ));
    }

    #[test]
    fn control_characters_are_escaped_in_messages() {
        let message = error("10.0.0.22\n\u{1b}[31m:80=:81").to_string();
        assert_eq!(message, "`10.0.0.22\\n\\u{1b}[31m` is not an IP address");
    }

    #[test]
    fn huge_port_reports_range() {
        let err = error("10.0.0.22:123456789012345678901234567890=:80");
        assert_eq!(err, RuleError::PortOutOfRange(u64::MAX));
    }

    #[test]
    fn rule_set_rejects_same_source() {
        let mut rules = RuleSet::default();
        rules
            .push(rule("10.0.0.22:80=:3000"), Origin::CommandLine)
            .unwrap();
        rules
            .push(rule("udp/10.0.0.22:80=:3000"), Origin::CommandLine)
            .unwrap();
        let config = Origin::Config {
            path: "bypass.toml".into(),
            line: 3,
        };
        let err = rules.push(rule("10.0.0.22:80=:4000"), config).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rule `tcp/10.0.0.22:80=10.0.0.22:4000` (bypass.toml:3) has the same source as \
             `tcp/10.0.0.22:80=10.0.0.22:3000` (--rule); remove one of them"
        );
        assert_eq!(rules.len(), 2);
    }

    #[test]
    fn default_rule_is_registry_redirect() {
        let rules = RuleSet::default_rules();
        let (rule, origin) = rules.iter().next().unwrap();
        assert_eq!(rule.to_string(), DEFAULT_RULE);
        assert_eq!(origin, &Origin::Default);
    }
}
