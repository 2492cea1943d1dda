// Renders Ollama Modelfile TEMPLATEs the way Ollama's server does (template/template.go:
// Parse with missingkey=zero and its functions, Execute with the .Messages data shape), so
// tests can compare the result with the Hugging Face chat template's string.
//
// stdin:  {"template": "...", "conversations": [[{"role": "...", "content": "..."}, ...], ...]}
// stdout: a JSON array with one rendered prompt per conversation.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
	"time"
)

type message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// templateMessage is the field set Ollama passes for each message.
type templateMessage struct {
	Role       string
	Content    string
	Thinking   string
	Images     []string
	ToolCalls  []any
	ToolName   string
	ToolCallID string
}

type input struct {
	Template      string      `json:"template"`
	Conversations [][]message `json:"conversations"`
}

var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(args ...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(args ...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(v any) string { return "any" },
}

// collate merges consecutive messages of the same role (not tool) and joins all system
// messages with a blank line, as Ollama's template.collate does.
func collate(msgs []message) (string, []*templateMessage) {
	var system []string
	var out []*templateMessage
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role && m.Role != "tool" {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, &templateMessage{Role: m.Role, Content: m.Content})
		}
	}
	return strings.Join(system, "\n\n"), out
}

func main() {
	var in input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(in.Template)
	if err != nil {
		panic(err)
	}
	results := []string{}
	for _, conv := range in.Conversations {
		system, msgs := collate(conv)
		var b strings.Builder
		err := tmpl.Execute(&b, map[string]any{
			"System":     system,
			"Messages":   msgs,
			"Tools":      nil,
			"Response":   "",
			"Think":      false,
			"ThinkLevel": "",
			"IsThinkSet": false,
		})
		if err != nil {
			panic(err)
		}
		results = append(results, b.String())
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		panic(err)
	}
}
