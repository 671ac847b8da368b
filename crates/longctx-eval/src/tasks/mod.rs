//! One file per task.

pub mod cwe;
pub mod fwe;
pub mod mecw;
pub mod niah;
pub mod passkey;
pub mod ppl;
pub mod threads;
pub mod vt;
