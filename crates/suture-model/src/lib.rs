//! suture-model
