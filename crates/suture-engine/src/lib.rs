//! suture-engine
