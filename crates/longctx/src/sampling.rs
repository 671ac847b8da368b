//! PLACEHOLDER owned by the CLI work: samplers.
