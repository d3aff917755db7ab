//! LongBench-Write's length score: how close an output's length comes to the required
//! length, 100 when equal, falling faster for outputs that are too short.

/// The score in [0, 100] of an output of `output` words for a required length of
/// `required` words: `100·max(0, 1 − (o/r − 1)/3)` when the output is longer, else
/// `100·max(0, 1 − (r/o − 1)/2)` (0 for an empty output). `required` must be above 0.
pub fn length_score(required: f64, output: f64) -> f64 {
    debug_assert!(required > 0.0, "the required length must be above 0");
    if output > required {
        100.0 * (1.0 - (output / required - 1.0) / 3.0).max(0.0)
    } else if output <= 0.0 {
        0.0
    } else {
        100.0 * (1.0 - (required / output - 1.0) / 2.0).max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn known_scores_for_a_thousand_words() {
        assert!(close(length_score(1000.0, 1000.0), 100.0));
        assert!(close(length_score(1000.0, 2000.0), 200.0 / 3.0));
        assert!(close(length_score(1000.0, 500.0), 50.0));
        assert!(close(length_score(1000.0, 4000.0), 0.0));
        assert!(close(length_score(1000.0, 9000.0), 0.0));
        assert!(close(length_score(1000.0, 1300.0), 90.0));
        assert!(close(length_score(1000.0, 800.0), 87.5));
        assert!(close(length_score(1000.0, 333.0), 0.0));
        assert!(close(length_score(1000.0, 0.0), 0.0));
    }

    #[test]
    fn short_outputs_lose_faster_than_long_ones() {
        // Twice too long keeps 2/3; twice too short keeps 1/2.
        assert!(length_score(600.0, 1200.0) > length_score(600.0, 300.0));
    }
}
