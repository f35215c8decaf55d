//! Shard discovery (ListShards) and the choice of which leases a replica takes.
//!
//! A shard is *eligible* when it is not finished and all its parents are finished (or aged out
//! of the stream): children of a split or merge are read only after their parents, so each
//! product's changes stay in order across a reshard.
//!
//! Balance: with `n` replicas holding leases (this one counted) and `e` eligible shards, each
//! replica aims at `ceil(e / n)`. Below target it takes free shards (unleased or expired); when
//! none are free and some replica holds more than the target, it steals one shard from the
//! busiest, one per renew interval, so a new replica gets its share without a stampede and a
//! stable split is never disturbed.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_kinesis::Client;

use super::{
    call::{CallError, Operation},
    lease::{ListedShard, is_leased, parents_finished},
    metrics::KinesisMetrics,
};
use crate::source::kinesis::lease::entity::Model;

/// Every shard of `stream`, open and closed, following `NextToken` pages where the server
/// pages (kinesalite returns everything at once).
///
/// # Errors
/// When a call fails.
#[tracing::instrument(skip_all, fields(%stream))]
pub(crate) async fn list_shards(
    client: &Client,
    stream: &str,
    metrics: &KinesisMetrics,
) -> Result<Vec<ListedShard>, CallError> {
    let mut shards = Vec::new();
    let mut next_token: Option<String> = None;
    loop {
        let request = match &next_token {
            // Kinesis refuses a stream name together with a page token.
            Some(token) => client.list_shards().next_token(token),
            None => client.list_shards().stream_name(stream),
        };
        let output = request
            .send()
            .await
            .map_err(|e| CallError::classify(Operation::ListShards, e))
            .inspect_err(|e| metrics.call(Operation::ListShards, e.outcome()))?;
        metrics.call(Operation::ListShards, "ok");
        shards.extend(
            output
                .shards
                .unwrap_or_default()
                .into_iter()
                .map(|shard| ListedShard {
                    shard_id: shard.shard_id,
                    parent_shard_id: shard.parent_shard_id,
                    adjacent_parent_shard_id: shard.adjacent_parent_shard_id,
                }),
        );
        match output.next_token {
            Some(token) if !token.is_empty() => next_token = Some(token),
            _ => return Ok(shards),
        }
    }
}

/// What one replica should do with the leases after looking at the table.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Free eligible shards to take, in order.
    pub(crate) take: Vec<String>,
    /// A shard to steal from the busiest replica, when nothing is free and it is over target.
    pub(crate) steal: Option<String>,
    /// Shards this replica holds that are not eligible (a replay reset their parent): release.
    pub(crate) release: Vec<String>,
}

/// Whether each shard may be read now: not finished, parents finished.
pub(crate) fn eligible(rows: &[Model]) -> HashMap<&str, bool> {
    let by_id: HashMap<&str, &Model> = rows.iter().map(|r| (r.shard_id.as_str(), r)).collect();
    rows.iter()
        .map(|row| {
            (
                row.shard_id.as_str(),
                !row.finished && parents_finished(row, &by_id),
            )
        })
        .collect()
}

/// Decides which leases replica `me` takes, steals or releases, given every row of the stream
/// at time `now` (Unix ms). Pure, so the balance rules are unit-tested without a database.
pub(crate) fn plan(rows: &[Model], me: &str, now: i64) -> Plan {
    let eligible = eligible(rows);
    let is_eligible = |row: &Model| eligible.get(row.shard_id.as_str()).copied() == Some(true);

    let mut load: BTreeMap<&str, Vec<&Model>> = BTreeMap::new();
    load.insert(me, Vec::new());
    let mut free = Vec::new();
    let mut release = Vec::new();
    for row in rows {
        let leased = is_leased(row, now);
        if !is_eligible(row) {
            if leased && row.lease_owner.as_deref() == Some(me) && !row.finished {
                release.push(row.shard_id.clone());
            }
            continue;
        }
        match row.lease_owner.as_deref() {
            Some(owner) if leased => load.entry(owner).or_default().push(row),
            _ => free.push(row.shard_id.clone()),
        }
    }

    let eligible_count = rows.iter().filter(|r| is_eligible(r)).count();
    let target = eligible_count.div_ceil(load.len());
    let mine = load.get(me).map_or(0, Vec::len);
    let wanted = target.saturating_sub(mine);
    let take: Vec<String> = free.into_iter().take(wanted).collect();

    let steal = if take.is_empty() && wanted > 0 {
        load.iter()
            .filter(|(owner, _)| **owner != me)
            .max_by_key(|(owner, held)| (held.len(), std::cmp::Reverse(**owner)))
            .filter(|(_, held)| held.len() > target)
            .and_then(|(_, held)| held.last())
            .map(|row| row.shard_id.clone())
    } else {
        None
    };
    Plan {
        take,
        steal,
        release,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_000_000;

    fn row(id: &str, owner: Option<&str>, parents: &[&str], finished: bool) -> Model {
        Model {
            stream_name: "s".into(),
            shard_id: id.into(),
            parent_shard_id: parents.first().map(|p| (*p).to_owned()),
            adjacent_parent_shard_id: parents.get(1).map(|p| (*p).to_owned()),
            checkpoint_sequence_number: None,
            finished,
            replay_from_ms: None,
            epoch: 0,
            lease_owner: owner.map(str::to_owned),
            lease_expires_ms: owner.map(|_| NOW + 10_000),
            lease_counter: 1,
            lag_millis: 0,
        }
    }

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_lone_replica_takes_every_eligible_shard() {
        let rows = [
            row("a", None, &[], false),
            row("b", None, &[], false),
            row("c", None, &["a"], false),
        ];
        let plan = plan(&rows, "me", NOW);
        assert_eq!(
            plan.take,
            ids(&["a", "b"]),
            "the child waits for its parent"
        );
        assert_eq!(plan.steal, None);
    }

    #[test]
    fn a_new_replica_steals_one_shard_at_a_time_until_the_split_is_even() {
        let mut rows = vec![
            row("a", Some("old"), &[], false),
            row("b", Some("old"), &[], false),
            row("c", Some("old"), &[], false),
            row("d", Some("old"), &[], false),
        ];
        let first = plan(&rows, "new", NOW);
        assert_eq!(first.take, Vec::<String>::new());
        assert_eq!(first.steal.as_deref(), Some("d"));
        rows[3].lease_owner = Some("new".into());
        let second = plan(&rows, "new", NOW);
        assert_eq!(second.steal.as_deref(), Some("c"));
        rows[2].lease_owner = Some("new".into());
        assert_eq!(plan(&rows, "new", NOW), Plan::default(), "two each: stable");
        assert_eq!(plan(&rows, "old", NOW), Plan::default());
    }

    #[test]
    fn an_uneven_count_is_left_alone_rather_than_bounced() {
        let rows = [
            row("a", Some("x"), &[], false),
            row("b", Some("x"), &[], false),
            row("c", Some("y"), &[], false),
        ];
        assert_eq!(plan(&rows, "y", NOW), Plan::default());
        assert_eq!(plan(&rows, "x", NOW), Plan::default());
    }

    #[test]
    fn expired_leases_are_free_and_taken() {
        let mut stopped = row("a", Some("gone"), &[], false);
        stopped.lease_expires_ms = Some(NOW - 1);
        let rows = [stopped, row("b", Some("me"), &[], false)];
        assert_eq!(plan(&rows, "me", NOW).take, ids(&["a"]));
    }

    #[test]
    fn children_become_eligible_when_all_parents_finish() {
        let rows = [
            row("p", None, &[], true),
            row("q", None, &[], false),
            row("split", None, &["p"], false),
            row("merged", None, &["p", "q"], false),
        ];
        assert_eq!(plan(&rows, "me", NOW).take, ids(&["q", "split"]));
    }

    #[test]
    fn a_held_shard_whose_parent_was_reset_is_released() {
        let rows = [
            row("p", None, &[], false),
            row("c", Some("me"), &["p"], false),
        ];
        let plan = plan(&rows, "me", NOW);
        assert_eq!(plan.release, ids(&["c"]));
        assert_eq!(plan.take, ids(&["p"]));
    }
}
