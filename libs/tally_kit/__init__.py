"""The Tally service kit: what every Tally service stands on, written once."""
