"""Training recipes: each network this project ships is trained by code in this package."""
