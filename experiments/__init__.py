"""Problems, data and configurations that reproduce the papers' results."""
