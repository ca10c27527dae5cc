//! Policy routing rules (`ip rule`) that steer marked packets into enc's routing table.

use serde::Serialize;

use crate::{Error, Result};

/// Address family of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleFamily {
    /// IPv4 (`ip -4 rule`).
    V4,
    /// IPv6 (`ip -6 rule`).
    V6,
}

/// Desired state of one rule: packets whose mark matches `fwmark/fwmask` look up `table`,
/// at `priority`. enc's rules carry protocol [`crate::RTPROT_ENC`] so that a restarted agent
/// finds exactly the rules it owns.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RuleSpec {
    /// Address family.
    pub family: RuleFamily,
    /// Rule priority (lower runs first); also the rule's identity for diffing.
    pub priority: u32,
    /// Mark value to match.
    pub fwmark: u32,
    /// Mask applied to the packet mark before comparing.
    pub fwmask: u32,
    /// Routing table to look up.
    pub table: u32,
}

impl RuleSpec {
    /// Refuses values the kernel would reject or misread.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &'static str| {
            Err(Error::InvalidRule {
                priority: self.priority,
                table: self.table,
                reason,
            })
        };
        if self.table == 0 {
            return bad("table 0 is unspecified");
        }
        if self.priority == 0 {
            return bad("priority 0 is reserved for the local table rule");
        }
        if self.fwmask == 0 {
            return bad("a zero mask matches every packet");
        }
        if self.fwmark & !self.fwmask != 0 {
            return bad("mark has bits outside the mask");
        }
        Ok(())
    }
}

/// Changes that bring the current rules to the desired ones.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuleChanges {
    /// Rules to add.
    pub add: Vec<RuleSpec>,
    /// Rules to delete.
    pub delete: Vec<RuleSpec>,
}

/// Computes the changes from `current` to `desired` (pure; rules are compared whole, since the
/// kernel has no "replace" for rules).
pub fn diff_rules(current: &[RuleSpec], desired: &[RuleSpec]) -> RuleChanges {
    let mut add: Vec<RuleSpec> = desired
        .iter()
        .filter(|d| !current.contains(d))
        .cloned()
        .collect();
    add.sort();
    add.dedup();
    let mut delete: Vec<RuleSpec> = current
        .iter()
        .filter(|c| !desired.contains(c))
        .cloned()
        .collect();
    delete.sort();
    delete.dedup();
    RuleChanges { add, delete }
}

/// Applies rule changes: additions first (so steering never lapses), then deletions; every
/// change is tried, and the first failure is returned with the count of the others.
pub fn apply_rules(backend: &dyn crate::LinkBackend, changes: &RuleChanges) -> Result<()> {
    let mut errors = Vec::new();
    for rule in &changes.add {
        if let Err(e) = backend.add_rule(rule) {
            tracing::warn!(?rule, error = %e, "adding rule failed");
            errors.push(e);
        }
    }
    for rule in &changes.delete {
        if let Err(e) = backend.delete_rule(rule) {
            tracing::warn!(?rule, error = %e, "deleting rule failed");
            errors.push(e);
        }
    }
    let attempted = changes.add.len() + changes.delete.len();
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(()),
        Some(first) => {
            let rest: Vec<Error> = errors.collect();
            Err(Error::Apply {
                attempted,
                failed: rest.len() + 1,
                first: Box::new(first),
                rest,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FakeLinks, LinkBackend};

    fn rule(priority: u32, table: u32) -> RuleSpec {
        RuleSpec {
            family: RuleFamily::V4,
            priority,
            fwmark: 0xe00,
            fwmask: 0xf00,
            table,
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(rule(1000, 229).validate().is_ok());
        for (bad, why) in [
            (rule(1000, 0), "table 0"),
            (rule(0, 229), "priority 0"),
            (
                RuleSpec {
                    fwmask: 0,
                    ..rule(1000, 229)
                },
                "zero mask",
            ),
            (
                RuleSpec {
                    fwmark: 0x1e00,
                    ..rule(1000, 229)
                },
                "outside the mask",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn diff_and_apply_converge() {
        let links = FakeLinks::new();
        let want = vec![
            rule(1000, 229),
            RuleSpec {
                family: RuleFamily::V6,
                ..rule(1000, 229)
            },
        ];
        links.add_rule(&rule(1001, 7)).unwrap();
        let changes = diff_rules(&links.dump_rules().unwrap(), &want);
        assert_eq!((changes.add.len(), changes.delete.len()), (2, 1));
        apply_rules(&links, &changes).unwrap();
        let mut got = links.dump_rules().unwrap();
        got.sort();
        let mut want_sorted = want.clone();
        want_sorted.sort();
        assert_eq!(got, want_sorted);
        assert_eq!(diff_rules(&got, &want), RuleChanges::default());
        // Adding an existing rule and deleting an absent one are both fine.
        links.add_rule(&want[0]).unwrap();
        links.delete_rule(&rule(5, 5)).unwrap();
        assert_eq!(links.dump_rules().unwrap().len(), 2);
    }
}
