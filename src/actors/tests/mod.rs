//! Actor tests in isolation: each actor against fake peers.
