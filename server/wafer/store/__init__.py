"""Vector stores behind one interface (Qdrant: embedded local mode or a server)."""
