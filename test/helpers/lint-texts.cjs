// Lints texts as if they were the given files of this repository (ESLint's API with eslint.config.mjs), in a
// process of its own: jest's module sandbox cannot load an ES module config. stdin: [{ file, text }], stdout:
// [[ "ruleId: message", ... ], ...] in the same order.
const { ESLint } = require('eslint');

let input = '';
process.stdin.on('data', (d) => (input += d));
process.stdin.on('end', async () => {
  const eslint = new ESLint({ cwd: process.cwd() });
  const out = [];
  for (const { file, text } of JSON.parse(input)) {
    const [result] = await eslint.lintText(text, { filePath: file });
    out.push(result.messages.map((m) => `${m.ruleId ?? 'parse'}: ${m.message}`));
  }
  process.stdout.write(JSON.stringify(out));
});
