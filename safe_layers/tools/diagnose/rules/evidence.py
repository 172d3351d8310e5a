"""A diagnose finding with the log lines that prove it."""

from safe_layers.tools.findings import Finding


def finding(model, rule, severity, point, message, fix, evidence, layer=None, **data):
    """A :class:`Finding` at ``point``'s line of the log (0 without one): ``evidence`` (Points,
    None ones left out) goes into ``data["evidence"]`` once per line, in line order, and
    ``point``'s iteration into ``data["iteration"]``; ``data["confidence"]`` is "high"
    (the log shows what the message says) unless the rule says less."""
    evidence = [p for p in evidence if p is not None and p.line is not None]
    seen, unique = set(), []
    for p in sorted(evidence, key=lambda p: p.line):
        if p.line not in seen:
            seen.add(p.line)
            unique.append(p)
    data["evidence"] = [{"line": p.line, "text": p.text} for p in unique]
    data.setdefault("confidence", "high")
    if point is not None and point.iteration is not None:
        data.setdefault("iteration", point.iteration)
    return Finding(model.path, point.line if point is not None else 0, 1 if point is not None else 0,
                   rule, severity, message, fix, layer=layer, data=data)
