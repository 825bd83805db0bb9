"""picchat: a small chat hub for a Raspberry Pi or any small Linux box."""

__version__ = "0.1.0"
