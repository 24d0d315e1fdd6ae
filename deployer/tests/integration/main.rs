//! Integration tests of the deployer.
