"""modelshelf agent: keeps a co-located model server stocked with the configured models."""
