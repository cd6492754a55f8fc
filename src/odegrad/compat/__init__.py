"""Drop-in replacements for other libraries' APIs."""
