"""Everything that imports torch or diffusers lives in this package."""
