//! `bypass status`: every attachment, pinned and running, with its rules and hits.

use std::{fs, path::Path};

use serde::Serialize;

use crate::{
    pin,
    record::{self, Record},
    rulemap::{RuleMapError, RuleMaps},
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "`bypass status` needs root (CAP_BPF and CAP_NET_ADMIN): without it, pinned \
         attachments in {}/bypass and records of running loaders in {} are hidden (mode \
         0700), and no rule or hit count can be read from the BPF maps; run it with sudo",
        pin::BPFFS,
        record::RUN_DIR
    )]
    NotPermitted,
}

/// One attachment as `status` shows it; also the `--json` format.
#[derive(Debug, Serialize)]
pub struct Attachment {
    /// `pinned` or `running`.
    pub kind: &'static str,
    /// The pin name, for pinned attachments.
    pub name: Option<String>,
    /// The loader's pid, for running attachments.
    pub pid: Option<u32>,
    /// The cgroup directory, when known.
    pub cgroup: Option<String>,
    pub cgroup_exists: bool,
    pub rules: Vec<RuleStatus>,
    /// Reason the rules could not be read, if they could not.
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RuleStatus {
    pub id: u32,
    pub rule: String,
    pub hits: u64,
}

/// Collects the attachments: the pinned one called `name`, or every one.
pub fn collect(name: Option<&str>) -> anyhow::Result<Vec<Attachment>> {
    let mut attachments = Vec::new();
    let names = match name {
        Some(name) => {
            pin::validate_name(name).map_err(|err| crate::exit::UsageError(err.into()))?;
            if !pin::dir(name).exists() {
                return Err(pin::PinError::NotFound(name.to_owned()).into());
            }
            vec![name.to_owned()]
        }
        None => pin::names()?,
    };
    for name in names {
        attachments.push(pinned(&name));
    }
    if name.is_none() {
        attachments.extend(running());
    }
    Ok(attachments)
}

fn pinned(name: &str) -> Attachment {
    let record = Record::read(&record::pinned_path(name)).ok();
    let maps = RuleMaps::from_pins(&pin::dir(name));
    describe("pinned", Some(name.to_owned()), record.as_ref(), maps)
}

/// The attachments of foreground loaders that still run; records of dead ones are removed.
fn running() -> Vec<Attachment> {
    let Ok(entries) = fs::read_dir(record::running_dir()) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for path in entries.filter_map(|entry| Some(entry.ok()?.path())) {
        let Ok(record) = Record::read(&path) else {
            continue;
        };
        if !record.loader_alive() {
            let _ = fs::remove_file(&path);
            continue;
        }
        let maps = RuleMaps::from_ids(record.maps);
        found.push(describe("running", None, Some(&record), maps));
    }
    found.sort_by_key(|attachment| attachment.pid);
    found
}

fn describe(
    kind: &'static str,
    name: Option<String>,
    record: Option<&Record>,
    maps: Result<RuleMaps, RuleMapError>,
) -> Attachment {
    let (rules, error) = match maps.and_then(|maps| rule_statuses(&maps)) {
        Ok(rules) => (rules, None),
        Err(err) => (Vec::new(), Some(format!("{:#}", anyhow::Error::from(err)))),
    };
    Attachment {
        kind,
        name,
        pid: record.and_then(|record| record.pid),
        cgroup: record.map(|record| record.cgroup.display().to_string()),
        cgroup_exists: record.is_some_and(Record::cgroup_exists),
        rules,
        error,
    }
}

fn rule_statuses(maps: &RuleMaps) -> Result<Vec<RuleStatus>, RuleMapError> {
    maps.rules()?
        .into_iter()
        .map(|(rule, id)| {
            Ok(RuleStatus {
                id,
                rule: rule.to_string(),
                hits: maps.hits(id)?,
            })
        })
        .collect()
}

/// Formats attachments for people: one header line each, then one line per rule.
pub fn render_text(attachments: &[Attachment]) -> String {
    if attachments.is_empty() {
        return "no attachments\n".to_owned();
    }
    let mut out = String::new();
    for attachment in attachments {
        let who = match (&attachment.name, attachment.pid) {
            (Some(name), _) => format!("pinned {name}"),
            (None, Some(pid)) => format!("running pid {pid}"),
            (None, None) => attachment.kind.to_owned(),
        };
        let cgroup = attachment.cgroup.as_deref().unwrap_or("(unknown cgroup)");
        let state = if attachment.cgroup_exists {
            ""
        } else {
            " (cgroup gone)"
        };
        out.push_str(&format!("{who}: {cgroup}{state}\n"));
        for rule in &attachment.rules {
            out.push_str(&format!(
                "  rule {}: {}  hits {}\n",
                rule.id, rule.rule, rule.hits
            ));
        }
        if let Some(error) = &attachment.error {
            out.push_str(&format!("  cannot read rules: {error}\n"));
        }
    }
    out
}

/// `bypass status [NAME] [--json]`.
pub fn status(name: Option<&str>, json: bool) -> anyhow::Result<()> {
    if crate::loader::check_privileges().is_err() {
        return Err(StatusError::NotPermitted.into());
    }
    if !pin::is_bpffs(Path::new(pin::BPFFS)) {
        log::debug!("no BPF file system at {}, so nothing is pinned", pin::BPFFS);
    }
    let attachments = collect(name)?;
    if json {
        let json = serde_json::to_string_pretty(&attachments)?;
        crate::exit::print_stdout(&format!("{json}\n"))?;
    } else {
        crate::exit::print_stdout(&render_text(&attachments))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_lists_rules_and_gone_cgroups() {
        let attachments = [Attachment {
            kind: "pinned",
            name: Some("ci".into()),
            pid: None,
            cgroup: Some("/sys/fs/cgroup/job".into()),
            cgroup_exists: false,
            rules: vec![RuleStatus {
                id: 0,
                rule: "tcp/10.0.0.22:80=10.0.0.22:3000".into(),
                hits: 3,
            }],
            error: None,
        }];
        assert_eq!(
            render_text(&attachments),
            "pinned ci: /sys/fs/cgroup/job (cgroup gone)\n  rule 0: tcp/10.0.0.22:80=10.0.0.22:3000  hits 3\n"
        );
        assert_eq!(render_text(&[]), "no attachments\n");
    }
}
