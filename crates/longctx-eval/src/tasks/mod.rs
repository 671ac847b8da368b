//! One file per task.

pub mod niah;
pub mod passkey;
