//! PLACEHOLDER owned by the CLI work: model fetching through pip.
