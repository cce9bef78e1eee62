//! Helpers for the project's own tests (unit and integration): not part of the API.

pub mod redis;
