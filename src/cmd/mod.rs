//! The commands, one module each: what is special about each of them.

pub mod transcribe;
