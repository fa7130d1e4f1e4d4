//! suture-process
