//! Start-up steps shared by `run` and `attach`: the rule set and the loaded programs.

use anyhow::Context as _;

use crate::{
    cli::RuleArgs,
    config,
    exit::UsageError,
    loader::{self, LoadError, LoadOptions, Redirector},
    names,
    rule::{Origin, Protocol, RuleSet},
};

/// Builds the rule set from `--rule` and `--config`, or the default rule when both are
/// absent. Every error is a [`UsageError`].
pub(crate) fn rules_from_args(args: &RuleArgs) -> Result<RuleSet, UsageError> {
    let mut rules = RuleSet::default();
    for text in &args.rules {
        let expanded = names::parse_rule(text).with_context(|| format!("invalid rule `{text}`"))?;
        for rule in expanded {
            rules
                .push(rule, Origin::CommandLine)
                .map_err(anyhow::Error::from)?;
        }
    }
    if let Some(path) = &args.config {
        config::load(path, &mut rules).map_err(anyhow::Error::from)?;
        if rules.is_empty() {
            // The default rule is for a command line without rules; a config file without
            // any (emptied for a reload, say) more likely means a mistake.
            return Err(UsageError(anyhow::anyhow!(
                "config file {} has no rules; add a [[rule]] table, or drop --config to use the \
                 default rule {}",
                path.display(),
                RuleSet::default_rules()
                    .iter()
                    .next()
                    .map_or(String::new(), |(rule, _)| rule.to_string())
            )));
        }
    }
    if rules.is_empty() {
        rules = RuleSet::default_rules();
    }
    Ok(rules)
}

/// Checks privileges, loads the programs and fills the rule maps. `rules_may_change` is true
/// when rules can be added later (a pin, or a config that SIGHUP reloads): then every program
/// is loaded, not only those that the rules use.
pub(crate) fn load(
    args: &RuleArgs,
    rules: &RuleSet,
    rules_may_change: bool,
) -> anyhow::Result<Redirector> {
    loader::check_privileges()?;
    let options = LoadOptions {
        max_rules: args.max_rules,
        log_rate: args.log_rate,
        udp: rules_may_change || rules.iter().any(|(rule, _)| rule.protocol == Protocol::Udp),
    };
    let redirector = Redirector::load(rules, options).map_err(|err| match err {
        // More rules than --max-rules is the user's input, so `attach` exits with USAGE.
        LoadError::TooManyRules { .. } => anyhow::Error::from(UsageError(err.into())),
        other => other.into(),
    })?;
    // Said only now, so a usage error found earlier stays the only line on stderr.
    if rules.iter().all(|(_, origin)| *origin == Origin::Default) {
        log::info!("no --rule or --config given; using the default rule");
    }
    for (rule_id, (rule, origin)) in rules.iter().enumerate() {
        log::info!("rule {rule_id}: {rule} ({origin})");
    }
    if args.log_rate == 0 {
        log::info!("hit log off (--log-rate 0, or --pin); hits are still counted");
    }
    Ok(redirector)
}
