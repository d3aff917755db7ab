//! The weight relay tree: which actor fetches the newest weights from which.
//!
//! Live actors that serve a relay are laid out breadth-first under the learner with
//! `fanout` children per node: those that hold the newest version first, then those
//! receiving it, then the rest, each group in join order. Late joiners and laggards thus
//! hang below actors that have (or are getting) the version they need, and the learner
//! sends each version to only `fanout` actors. An actor's sources are its ancestors,
//! nearest first, then the learner as the fallback.

use crate::LEARNER_SOURCE;
use quill_proto::WeightSource;

/// Ancestors handed out as sources before the learner.
pub const MAX_RELAY_SOURCES: usize = 3;

/// A live actor as the tree sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// Member id.
    pub id: String,
    /// Relay `HOST:PORT`; empty for an actor that does not relay (always a leaf).
    pub address: String,
    /// It runs the newest version.
    pub holds: bool,
    /// It is receiving the newest version.
    pub receiving: bool,
}

/// The learner as a source.
pub fn learner_source() -> WeightSource {
    WeightSource {
        member_id: LEARNER_SOURCE.to_owned(),
        address: String::new(),
    }
}

/// The ordered sources from which `member` fetches the newest version: up to
/// [`MAX_RELAY_SOURCES`] relaying ancestors, nearest first, then the learner. `nodes` are
/// the live actors in join order; `fanout` 0 (or an unknown member) gives the learner only.
pub fn sources(nodes: &[Node], member: &str, fanout: usize) -> Vec<WeightSource> {
    let mut out = Vec::new();
    if fanout > 0 {
        let order = layout(nodes);
        if let Some(mut pos) = order.iter().position(|n| n.id == member) {
            while pos >= fanout && out.len() < MAX_RELAY_SOURCES {
                pos = pos / fanout - 1;
                let parent = order[pos];
                if !parent.address.is_empty() {
                    out.push(WeightSource {
                        member_id: parent.id.clone(),
                        address: parent.address.clone(),
                    });
                }
            }
        }
    }
    out.push(learner_source());
    out
}

/// Breadth-first positions: relaying holders of the newest version, relaying receivers,
/// other relaying actors, then actors that do not relay; join order within each group.
fn layout(nodes: &[Node]) -> Vec<&Node> {
    let rank = |n: &Node| match () {
        _ if n.address.is_empty() => 3,
        _ if n.holds => 0,
        _ if n.receiving => 1,
        _ => 2,
    };
    let mut order: Vec<&Node> = nodes.iter().collect();
    order.sort_by_key(|n| rank(n));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest version in these tests.
    const LATEST: u64 = 3;

    fn node(id: &str, version: u64, receiving: u64) -> Node {
        Node {
            id: id.into(),
            address: format!("127.0.0.1:{}", 1000 + id.len()),
            holds: version >= LATEST,
            receiving: receiving == LATEST,
        }
    }

    fn ids(sources: &[WeightSource]) -> Vec<&str> {
        sources.iter().map(|s| s.member_id.as_str()).collect()
    }

    #[test]
    fn fanout_shapes_the_tree_and_the_learner_is_last() {
        let nodes: Vec<Node> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|id| node(id, 1, 0))
            .collect();
        // fan-out 2: a, b under the learner; c, d under a; e, f under b; g under c.
        let of = |m| ids(&sources(&nodes, m, 2)).join(",");
        assert_eq!(of("a"), "learner");
        assert_eq!(of("b"), "learner");
        assert_eq!(of("c"), "a,learner");
        assert_eq!(of("d"), "a,learner");
        assert_eq!(of("e"), "b,learner");
        assert_eq!(of("f"), "b,learner");
        assert_eq!(of("g"), "c,a,learner");
        // fan-out 1 is a chain; only MAX_RELAY_SOURCES ancestors are handed out.
        let of1 = |m| ids(&sources(&nodes, m, 1)).join(",");
        assert_eq!(of1("a"), "learner");
        assert_eq!(of1("c"), "b,a,learner");
        assert_eq!(of1("g"), "f,e,d,learner");
        // fan-out 0 disables relaying.
        assert_eq!(of0(&nodes), vec!["learner"; 7]);
        // Each node has at most `fanout` children.
        for fanout in 1..4 {
            let mut children = std::collections::HashMap::new();
            for n in &nodes {
                *children
                    .entry(sources(&nodes, &n.id, fanout)[0].member_id.clone())
                    .or_insert(0) += 1;
            }
            assert!(children.values().all(|&c| c <= fanout), "{children:?}");
        }
    }

    fn of0(nodes: &[Node]) -> Vec<String> {
        nodes
            .iter()
            .map(|n| ids(&sources(nodes, &n.id, 0)).join(","))
            .collect()
    }

    #[test]
    fn late_joiners_and_laggards_hang_below_holders() {
        // a joined first but lags at version 1; b holds 3; c receives 3; d just joined.
        let nodes = vec![
            node("a", 1, 0),
            node("b", 3, 0),
            node("c", 2, 3),
            node("d", 0, 0),
        ];
        let of = |m| ids(&sources(&nodes, m, 1)).join(",");
        assert_eq!(of("b"), "learner", "the holder sits at the top");
        assert_eq!(of("c"), "b,learner", "the receiver comes next");
        assert_eq!(of("a"), "c,b,learner", "the laggard hangs below them");
        assert_eq!(of("d"), "a,c,b,learner", "the late joiner comes last");
    }

    #[test]
    fn departed_and_non_relaying_actors_are_never_parents() {
        let mut nodes = vec![node("a", 1, 0), node("b", 1, 0), node("c", 1, 0)];
        assert_eq!(ids(&sources(&nodes, "c", 1)), ["b", "a", "learner"]);
        // b departs (the hub no longer lists it): c moves up under a.
        nodes.remove(1);
        assert_eq!(ids(&sources(&nodes, "c", 1)), ["a", "learner"]);
        // An actor without a relay address is only ever a leaf.
        nodes.insert(
            0,
            Node {
                address: String::new(),
                ..node("x", 1, 0)
            },
        );
        assert_eq!(ids(&sources(&nodes, "a", 1)), ["learner"]);
        assert_eq!(ids(&sources(&nodes, "x", 1)), ["c", "a", "learner"]);
        // A member the hub does not know gets the learner.
        assert_eq!(ids(&sources(&nodes, "zz", 1)), ["learner"]);
    }
}
