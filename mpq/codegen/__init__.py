"""Code generation: every generated text file is rendered from a Jinja2 template."""
