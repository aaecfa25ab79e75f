"""fastgen.train."""
