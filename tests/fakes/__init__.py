"""Stand-ins for outside services (the Hugging Face Hub) that tests run locally, offline."""
