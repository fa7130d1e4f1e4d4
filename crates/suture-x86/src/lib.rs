//! suture-x86
