// The browser console (docs/console.md): server-rendered pages with htmx, served by the gateway at /console.
export { consoleRouter, type ConsoleDeps } from './router';
export { escapeHtml, html, Html } from './html';
