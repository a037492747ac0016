"""Templates rendered where a runaway cannot hurt: the sandbox, the render processes,
the renderer that maps their answers to our errors, and what a template is made of.

Shared because two kinds of service render: TemplateService (test renders at save, the
RenderTemplate RPC) and the workers (the versions their jobs pin). The limits are the
same wherever rendering runs.
"""
