//! Locating a TOML deserialisation error: the dotted path of the field at the error's
//! span, and the span's line and column.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Finds the key or value at `span` under `table`, appending its dotted path to
/// `path`; the deepest match wins.
pub(super) fn find_in_table(table: &DeTable<'_>, span: &Range<usize>, path: &mut String) -> bool {
    for (key, value) in table {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key.get_ref());
        if find_in_value(value, span, path) || key.span() == *span || value.span() == *span {
            return true;
        }
        path.truncate(len);
    }
    false
}

/// [`find_in_table`] inside a value's tables and arrays.
fn find_in_value(value: &Spanned<DeValue<'_>>, span: &Range<usize>, path: &mut String) -> bool {
    match value.get_ref() {
        DeValue::Table(table) => find_in_table(table, span, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(index, item)| {
            let len = path.len();
            path.push_str(&format!("[{index}]"));
            let found = find_in_value(item, span, path) || item.span() == *span;
            if !found {
                path.truncate(len);
            }
            found
        }),
        _ => false,
    }
}

/// The 1-based line and column (in characters) of byte `offset` of `text`.
pub(super) fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests {
    use crate::job::tests::{invalid, job};

    #[test]
    fn an_unknown_key_is_named_with_its_section() {
        let (field, reason) = invalid(&job("[grpo]\nepsilon_low = 0.1\n"));
        assert_eq!(field, "grpo.epsilon_low");
        assert!(
            reason.starts_with("unknown field `epsilon_low`"),
            "{reason}"
        );
        assert!(reason.ends_with("(line 4, column 1)"), "{reason}");
        let (field, _) = invalid(&job("[rewards.format]\nmax_share = 0.1\n"));
        assert_eq!(field, "rewards.format.max_share");
        let (field, reason) = invalid(&job("[grpoo]\nsteps = 3\n"));
        assert_eq!(field, "grpoo");
        assert!(reason.starts_with("unknown field `grpoo`"), "{reason}");
        let (field, _) = invalid("job = { name = \"x\", nmae = \"y\" }");
        assert_eq!(field, "job.nmae");
    }

    #[test]
    fn a_value_of_the_wrong_type_is_named() {
        let (field, reason) = invalid(&job("[sampling]\ngroup_size = \"8\"\n"));
        assert_eq!(field, "sampling.group_size");
        assert!(reason.contains("invalid type: string \"8\""), "{reason}");
        assert!(reason.ends_with("(line 4, column 14)"), "{reason}");
        let (field, reason) = invalid(&job("[grpo]\nkl_estimator = \"k4\"\n"));
        assert_eq!(field, "grpo.kl_estimator");
        assert!(reason.contains("unknown variant `k4`"), "{reason}");
        let (field, reason) = invalid(&job("[grpo]\nprecision = \"fp16\"\n"));
        assert_eq!(field, "grpo.precision");
        assert!(
            reason.contains("unknown variant `fp16`, expected `f32` or `bf16`"),
            "{reason}"
        );
        let (field, _) = invalid(&job("[grpo]\npacking = \"yes\"\n"));
        assert_eq!(field, "grpo.packing");
        let (field, reason) = invalid(&job("[optimizer]\nbetas = [0.9, 0.99, 0.999]\n"));
        assert_eq!(field, "optimizer.betas");
        assert!(
            reason.starts_with("invalid length 3, expected an array of 2 numbers"),
            "{reason}"
        );
        let (field, _) = invalid(&job("[optimizer]\nbetas = [0.9]\n"));
        assert_eq!(field, "optimizer.betas");
        let (field, _) = invalid(&job("[sampling]\nstop = [\"a\", 3]\n"));
        assert_eq!(field, "sampling.stop[1]");
        let (field, _) = invalid(&job("[metrics]\nprometheus_addr = 9090\n"));
        assert_eq!(field, "metrics.prometheus_addr");
    }
}
