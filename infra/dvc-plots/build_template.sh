#!/usr/bin/env bash
# Rebuild template.html: DVC's plot page with Vega, Vega-Lite and vega-embed inlined, so `dvc plots show` renders
# offline (DVC's own page loads them from a CDN). The versions are those DVC's renderer names (dvc_render/vega.py).
# Needs npm (the registry only). Usage: infra/dvc-plots/build_template.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null
for package in vega-5.20.2 vega-lite-5.2.0 vega-embed-6.18.2; do
  mkdir "$package" && tar xzf "$package.tgz" -C "$package" --strip-components 1
done
{
  cat <<'HTML'
<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>blip-pipeline: DVC plots</title>
    <!-- Vega 5.20.2, Vega-Lite 5.2.0, vega-embed 6.18.2 (BSD-3-Clause, https://vega.github.io), inlined by
         infra/dvc-plots/build_template.sh so that the page needs no network. -->
HTML
  for file in vega-5.20.2/build/vega.min.js vega-lite-5.2.0/build/vega-lite.min.js \
              vega-embed-6.18.2/build/vega-embed.min.js; do
    printf '    <script type="text/javascript">\n'
    cat "$file"
    printf '\n    </script>\n'
  done
  cat <<'HTML'
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
</head>
<body>
    <h2>blip-pipeline: training curves (@pretrain and @capfilt overlaid)</h2>
    {plot_divs}
</body>
</html>
HTML
} > "$here/template.html"
echo "wrote $here/template.html ($(wc -c < "$here/template.html") bytes)"
