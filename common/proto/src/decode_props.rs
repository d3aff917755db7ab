//! Property tests of protocol decoding: arbitrary bytes, and valid messages with bytes
//! flipped or cut, decode to an error or to a message that encodes back to a message that
//! decodes the same; nothing panics.

use crate::{HeartbeatRequest, LeaseRequest, RegisterRequest, RolloutGroup, Sample, ScoredGroup};
use proptest::prelude::*;
use prost::Message;

/// Decodes `bytes` as `M`; when that works, the message survives an encode–decode round.
fn round_trips<M: Message + Default + PartialEq + std::fmt::Debug>(
    bytes: &[u8],
) -> Result<(), TestCaseError> {
    if let Ok(message) = M::decode(bytes) {
        let again = M::decode(message.encode_to_vec().as_slice());
        prop_assert_eq!(again.as_ref(), Ok(&message));
    }
    Ok(())
}

/// A valid scored group's encoding.
fn scored(tokens: Vec<i64>, text: String) -> Vec<u8> {
    ScoredGroup {
        rollout: Some(RolloutGroup {
            lease_id: 7,
            prompt_tokens: tokens.clone(),
            samples: vec![Sample {
                logprobs: vec![-1.0; tokens.len()],
                tokens,
                text,
                ..Sample::default()
            }],
            ..RolloutGroup::default()
        }),
        advantages: vec![0.5],
        ..ScoredGroup::default()
    }
    .encode_to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn arbitrary_bytes_decode_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        round_trips::<ScoredGroup>(&bytes)?;
        round_trips::<RolloutGroup>(&bytes)?;
        round_trips::<RegisterRequest>(&bytes)?;
        round_trips::<HeartbeatRequest>(&bytes)?;
        round_trips::<LeaseRequest>(&bytes)?;
    }

    #[test]
    fn damaged_groups_decode_or_fail_cleanly(
        tokens in prop::collection::vec(any::<i64>(), 0..64),
        text in ".{0,40}",
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = scored(tokens, text);
        prop_assert!(ScoredGroup::decode(bytes.as_slice()).is_ok());
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value;
        }
        round_trips::<ScoredGroup>(&bytes)?;
        let keep = cut.index(bytes.len() + 1);
        round_trips::<ScoredGroup>(&bytes[..keep])?;
    }
}
