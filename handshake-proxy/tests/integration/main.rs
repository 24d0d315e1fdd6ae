//! Integration tests of the handshake proxy against the real deployer.
