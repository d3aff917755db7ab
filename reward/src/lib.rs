//! Rewards of the LongWriter-Zero recipe.
