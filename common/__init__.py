"""What two or more shoal components share: value types, config, errors, certificates, tokens."""
