"""Views: the only code that prints or draws. Terminal tables and live views, HTML pages
(Jinja2) and charts (matplotlib SVG), with one place for number and size formats."""
