//! Reading a judge's reply: a rating from its text or from its first token's
//! distribution, or a pairwise verdict.

use serde_json::Value;

/// The rating after the last `score` in `text` (case-insensitive, e.g. `Score: 7`), or
/// the whole reply when it is just a number; it must lie in `[min, max]`.
pub fn rating_from_text(text: &str, min: f64, max: f64) -> Result<f64, String> {
    let lower = text.to_ascii_lowercase();
    let number = match lower.rfind("score") {
        Some(at) => {
            let tail = text[at + "score".len()..].trim_start_matches(|c: char| {
                c == ':' || c == '*' || c == '=' || c.is_whitespace()
            });
            let number: String = tail
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            number.trim_end_matches('.').to_owned()
        }
        None => text.trim().to_owned(),
    };
    let value: f64 = number.parse().map_err(|_| {
        format!(
            "no rating found (expected `Score: N`) in {:?}",
            text.chars().take(200).collect::<String>()
        )
    })?;
    if !(min..=max).contains(&value) {
        return Err(format!("the rating {value} is outside [{min}, {max}]"));
    }
    Ok(value)
}

/// The expected rating over the first generated token's `top_logprobs` (OpenAI's chat
/// format), counting tokens that are whole numbers in `[min, max]`.
pub fn rating_from_logprobs(reply: &Value, min: f64, max: f64) -> Result<f64, String> {
    let top = reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        .as_array()
        .ok_or("the reply has no top_logprobs for its first token")?;
    let (mut mass, mut sum) = (0.0, 0.0);
    for entry in top {
        let (Some(token), Some(logprob)) = (entry["token"].as_str(), entry["logprob"].as_f64())
        else {
            return Err(format!(
                "a top_logprobs entry is not {{token, logprob}}: {entry}"
            ));
        };
        if let Ok(k) = token.trim().parse::<u32>() {
            let k = f64::from(k);
            if (min..=max).contains(&k) {
                let p = logprob.exp();
                mass += p;
                sum += p * k;
            }
        }
    }
    if mass <= 0.0 {
        return Err(format!(
            "no rating from {min} to {max} among the first token's {} most likely tokens",
            top.len()
        ));
    }
    Ok(sum / mass)
}

/// A pairwise verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The first answer shown is better.
    A,
    /// The second answer shown is better.
    B,
    /// Neither.
    Tie,
}

/// The last of `[[A]]`, `[[B]]`, `[[TIE]]` in `text`, or a reply that is just `A`, `B`
/// or `tie`.
pub fn verdict(text: &str) -> Result<Verdict, String> {
    let upper = text.to_uppercase();
    let marked = [
        ("[[A]]", Verdict::A),
        ("[[B]]", Verdict::B),
        ("[[TIE]]", Verdict::Tie),
        ("[[C]]", Verdict::Tie),
    ]
    .into_iter()
    .filter_map(|(mark, v)| upper.rfind(mark).map(|at| (at, v)))
    .max_by_key(|(at, _)| *at);
    if let Some((_, v)) = marked {
        return Ok(v);
    }
    match upper.trim().trim_end_matches('.') {
        "A" => Ok(Verdict::A),
        "B" => Ok(Verdict::B),
        "TIE" => Ok(Verdict::Tie),
        _ => Err(format!(
            "no verdict ([[A]], [[B]] or [[TIE]]) in {:?}",
            text.chars().take(200).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ratings_are_read_from_text() {
        assert_eq!(
            rating_from_text("Good prose.\nScore: 7", 1.0, 10.0),
            Ok(7.0)
        );
        assert_eq!(
            rating_from_text("score 3 at first... **Score**: 8.5.", 1.0, 10.0),
            Ok(8.5)
        );
        assert_eq!(rating_from_text(" 4 ", 1.0, 10.0), Ok(4.0));
        assert!(rating_from_text("Score: 11", 1.0, 10.0)
            .unwrap_err()
            .contains("outside"));
        assert!(rating_from_text("lovely", 1.0, 10.0)
            .unwrap_err()
            .contains("no rating"));
        assert!(rating_from_text("5 apples", 1.0, 10.0).is_err());
    }

    #[test]
    fn the_expected_rating_weighs_the_first_token() {
        let reply = json!({"choices": [{"logprobs": {"content": [{"token": "7", "logprob": 0.0,
            "top_logprobs": [{"token": "7", "logprob": (0.75f64).ln()}, {"token": " 9", "logprob": (0.25f64).ln()},
                             {"token": "the", "logprob": -0.1}, {"token": "42", "logprob": -0.2}]}]}}]});
        let r = rating_from_logprobs(&reply, 1.0, 10.0).unwrap();
        assert!((r - 7.5).abs() < 1e-9, "{r}");
        let none = json!({"choices": [{"logprobs": {"content": [{"top_logprobs": [{"token": "x", "logprob": 0.0}]}]}}]});
        assert!(rating_from_logprobs(&none, 1.0, 10.0).is_err());
        assert!(rating_from_logprobs(&json!({}), 1.0, 10.0).is_err());
    }

    #[test]
    fn verdicts_take_the_last_mark() {
        assert_eq!(verdict("A is vivid but [[B]]"), Ok(Verdict::B));
        assert_eq!(verdict("[[B]] no wait, [[A]]"), Ok(Verdict::A));
        assert_eq!(verdict("[[tie]]"), Ok(Verdict::Tie));
        assert_eq!(verdict("b."), Ok(Verdict::B));
        assert!(verdict("both fine").is_err());
    }
}
