//! PLACEHOLDER owned by the tokenizer work: chat templates rendered with minijinja.
