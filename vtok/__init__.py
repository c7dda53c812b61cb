"""vtok: visual-token compression for VLMs and ViTs."""
