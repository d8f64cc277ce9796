"""Protocol package ``asyncfl``."""
