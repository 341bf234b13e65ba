"""liveavatar."""
