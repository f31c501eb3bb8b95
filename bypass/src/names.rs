//! Host names as rule sources: `--rule registry.example.internal:80=10.0.0.22:3000`.
//!
//! The name is resolved once, at start, through the host's resolver (`getaddrinfo`, so
//! `/etc/hosts` and DNS as `nsswitch.conf` orders them). Every address it resolves to becomes
//! one rule; later changes of the name's addresses are not followed.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};

use crate::rule::{Protocol, Rule, RuleError};

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("cannot resolve host name `{name}`; check the name, or write an IP address")]
    Resolve {
        name: String,
        source: std::io::Error,
    },
    #[error(
        "host name `{name}` resolves only to {family} addresses, but the target is {target}; \
         give a target of the same family or `:PORT`"
    )]
    NoAddressOfFamily {
        name: String,
        family: &'static str,
        target: IpAddr,
    },
}

/// Returns whether `host` is a syntactically valid DNS name that is not an IP address.
fn is_host_name(host: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    };
    host.len() <= 253
        && host.parse::<IpAddr>().is_err()
        && host.bytes().any(|byte| byte.is_ascii_alphabetic())
        && host.trim_end_matches('.').split('.').all(label_ok)
}

/// Splits `[proto/]HOST:PORT=TO` into its parts when HOST is a host name.
fn split_named(text: &str) -> Option<(Protocol, &str, &str, &str)> {
    let text = text.trim();
    let (protocol, body) = match text.split_once('/') {
        Some((protocol, body)) => (protocol.parse().ok()?, body),
        None => (Protocol::Tcp, text),
    };
    let (from, to) = body.split_once('=')?;
    let (host, port) = from.trim().rsplit_once(':')?;
    is_host_name(host).then_some((protocol, host, port, to.trim()))
}

/// Parses a rule whose source may be a host name; returns one rule per resolved address.
pub fn parse_rule(text: &str) -> anyhow::Result<Vec<Rule>> {
    let Some((protocol, host, port, to)) = split_named(text) else {
        return Ok(vec![text.parse::<Rule>()?]);
    };
    // Port and target syntax errors come before any lookup.
    Rule::new(protocol, &format!("0.0.0.0:{port}"), to).or_else(|err| match err {
        RuleError::FamilyMismatch { .. } => Rule::new(protocol, &format!("[::]:{port}"), to),
        err => Err(err),
    })?;
    let resolve_error = |source| NameError::Resolve {
        name: host.to_owned(),
        source,
    };
    let mut addresses: Vec<IpAddr> = (host, 0u16)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .map(|addr| addr.ip())
        .collect();
    addresses.sort();
    addresses.dedup();
    rules_for(protocol, host, port, to, &addresses)
}

/// Builds one rule per address; addresses of the other family than an explicit target are
/// left out with a warning.
fn rules_for(
    protocol: Protocol,
    host: &str,
    port: &str,
    to: &str,
    addresses: &[IpAddr],
) -> anyhow::Result<Vec<Rule>> {
    let target_ip = to.rsplit_once(':').and_then(|(ip, _)| {
        ip.trim_matches(|c| c == '[' || c == ']')
            .parse::<IpAddr>()
            .ok()
    });
    let mut rules = Vec::new();
    for &address in addresses {
        if target_ip.is_some_and(|target| target.is_ipv4() != address.is_ipv4()) {
            log::warn!(
                "`{host}` resolves to {address} too, which no rule covers: the target is of the other family"
            );
            continue;
        }
        // The port was checked by `parse_rule` before the lookup.
        let from = SocketAddr::new(address, port.parse()?).to_string();
        let rule = Rule::new(protocol, &from, to)?;
        log::info!("`{host}` resolves to {address}: rule {rule}");
        rules.push(rule);
    }
    match (rules.is_empty(), target_ip) {
        (true, Some(target)) => Err(NameError::NoAddressOfFamily {
            name: host.to_owned(),
            family: if target.is_ipv4() { "IPv6" } else { "IPv4" },
            target,
        }
        .into()),
        _ => Ok(rules),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_told_from_addresses() {
        assert!(is_host_name("registry.example.internal"));
        assert!(is_host_name("localhost"));
        assert!(!is_host_name("10.0.0.22"));
        assert!(!is_host_name("[fd00::22]"));
        assert!(!is_host_name("bad_name.example"));
        assert!(!is_host_name("-lead.example"));
    }

    #[test]
    fn ip_rules_pass_through_without_lookup() {
        let rules = parse_rule("udp/10.0.0.53:53=127.0.0.1:5353").expect("valid");
        assert_eq!(
            rules,
            vec!["udp/10.0.0.53:53=127.0.0.1:5353".parse().unwrap()]
        );
        assert!(parse_rule("10.0.0.300:53=:1").is_err());
    }

    #[test]
    fn each_address_becomes_a_rule() {
        let addresses = ["10.0.0.22".parse().unwrap(), "fd00::22".parse().unwrap()];
        let same = rules_for(Protocol::Tcp, "r.example", "80", ":3000", &addresses).unwrap();
        let shown: Vec<String> = same.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "tcp/10.0.0.22:80=10.0.0.22:3000",
                "tcp/[fd00::22]:80=[fd00::22]:3000"
            ]
        );

        let v4 = rules_for(
            Protocol::Tcp,
            "r.example",
            "80",
            "10.0.0.9:3000",
            &addresses,
        )
        .unwrap();
        assert_eq!(v4.len(), 1);
        assert_eq!(v4[0].to_string(), "tcp/10.0.0.22:80=10.0.0.9:3000");

        let v6_only = ["fd00::22".parse().unwrap()];
        let err =
            rules_for(Protocol::Tcp, "r.example", "80", "10.0.0.9:3000", &v6_only).unwrap_err();
        assert!(
            err.to_string().contains("resolves only to IPv6 addresses"),
            "{err}"
        );
    }

    #[test]
    fn bad_port_fails_before_lookup() {
        let err = parse_rule("registry.example.internal:0=:3000").unwrap_err();
        assert!(err.to_string().contains("out of range"), "{err}");
    }

    #[test]
    fn localhost_resolves_locally() {
        let rules = parse_rule("localhost:8080=:3000").expect("localhost resolves");
        assert!(
            rules
                .iter()
                .any(|rule| rule.from == "127.0.0.1:8080".parse().unwrap())
        );
    }
}
