"""Dataset builders and helpers shared by recipes and families."""
